"""fnn.models.GPT2 / Llama against Hugging Face transformers' GPT2LMHeadModel / LlamaForCausalLM
(random tiny models in float64, their state_dict loaded into fnn): logits within 1e-9, the hand
gradient of a next-token loss within 1e-8 of torch autograd, greedy generation with fnn's KV
cache giving transformers' generate(do_sample=False) tokens, and saving back (state_dict and a hub
directory) loading in transformers with equal logits. Runs where torch and transformers are
installed (an extra; skipped otherwise).

transformers' Llama computes RMSNorm and the rotary angles in float32 whatever the model's dtype
(``hidden_states.to(torch.float32)``, ``inv_freq`` in float32): :func:`float64_llama` patches those
two modules of the reference to run the same equations in the model's dtype, so the comparison is
at float64 round-off instead of float32's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fnn import models                                                  
from fnn.models import generate, gpt2, llama, value_and_grad           
from fnn.torch_weights import StateDictError, load_state_dict, state_dict

V = 50
GPT2_CFG = dict(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=4, n_inner=24,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-4,
                bos_token_id=0, eos_token_id=18, activation_function="gelu_new")
LLAMA_CFG = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                 rms_norm_eps=1e-5, eos_token_id=7)
CASES = {"gpt2": (gpt2, "GPT2LMHeadModel", "GPT2Config", GPT2_CFG),
         "gpt2-untied": (gpt2, "GPT2LMHeadModel", "GPT2Config",
                         {**GPT2_CFG, "tie_word_embeddings": False}),
         "llama": (llama, "LlamaForCausalLM", "LlamaConfig", LLAMA_CFG),
         "llama-tied-bias": (llama, "LlamaForCausalLM", "LlamaConfig",
                             {**LLAMA_CFG, "tie_word_embeddings": True, "attention_bias": True,
                              "mlp_bias": True, "num_key_value_heads": 1, "head_dim": 6})}


def float64_llama(hf):
    """The reference's RMSNorm and rotary embedding run in the model's dtype (see module doc)."""
    rot = getattr(getattr(hf, "model", None), "rotary_emb", None)
    if rot is None:
        return hf
    c = hf.config
    theta = (c.rope_parameters or {}).get("rope_theta") if hasattr(c, "rope_parameters") \
        else c.rope_theta
    d = c.head_dim
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)

    def rope(x, position_ids):
        f = position_ids[..., None].double() * inv
        e = torch.cat((f, f), -1)
        return e.cos().to(x.dtype), e.sin().to(x.dtype)
    rot.forward = rope
    for m in hf.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = lambda h, m=m: m.weight * (
                h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
    return hf


def reference(case, seed=0):
    module, arch, config_cls, cfg = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**cfg)
    hf = getattr(transformers, arch)(config).double().eval()
    with torch.no_grad():                    # biases and norm weights away from their init
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return module, float64_llama(hf), config.to_dict()


def to_fnn(module, hf, config):
    model = module.from_hf_config(config)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params, state = load_state_dict(model, sd, module.hf_input_shape(config))
    return model, params, state, sd


def ids(shape, seed=1):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_gradient_and_state_dict_round_trip(case):
    module, hf, config = reference(case)
    model, params, state, sd = to_fnn(module, hf, config)
    x, y = ids((2, 9)), ids((2, 9), seed=2)
    out = hf(torch.from_numpy(x))
    got = jax.jit(model.apply)(params, state, jnp.asarray(x))[0]
    np.testing.assert_allclose(got, out.logits.detach().numpy(), rtol=0, atol=1e-9)
    # the hand gradient of the mean next-token cross-entropy against torch autograd
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V),
                                             torch.from_numpy(y).reshape(-1))
    loss.backward()
    (l_fnn, _), grads = jax.jit(value_and_grad(model))(params, state, jnp.asarray(x),
                                                       jnp.asarray(y))
    assert abs(float(l_fnn) - loss.item()) < 1e-12
    g_sd = state_dict(model, grads, state, module.hf_input_shape(config))
    named = dict(hf.named_parameters())                   # a tied weight appears once
    assert set(named) <= set(g_sd)
    for k, p in named.items():
        np.testing.assert_allclose(g_sd[k], p.grad.numpy(), rtol=0, atol=1e-8, err_msg=k)
    # saving back: bit-exact, and transformers takes it
    back = state_dict(model, params, state, module.hf_input_shape(config))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    _, hf2, _ = reference(case, seed=5)
    hf2.load_state_dict({k: torch.tensor(np.array(v)) for k, v in back.items()},
                        strict=True)
    np.testing.assert_allclose(hf2(torch.from_numpy(x)).logits.detach().numpy(),
                               out.logits.detach().numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_greedy_generation_matches_transformers(case):
    """fnn's KV-cache greedy tokens equal model.generate(do_sample=False), eos and padding
    included (a row of each reaches it): transformers stops once every row is done, fnn keeps
    the length and pads."""
    module, hf, config = reference(case)
    model, params, _, _ = to_fnn(module, hf, config)
    prompt = ids((3, 4), seed=3)
    want = hf.generate(torch.from_numpy(prompt), attention_mask=torch.ones(3, 4, dtype=int),
                       do_sample=False, max_new_tokens=12).numpy()
    got = np.asarray(generate(model, params, prompt, 12, eos_token_id=config["eos_token_id"],
                              pad_token_id=config["pad_token_id"]))
    assert got.shape == (3, 16) and want.shape[1] >= 6
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)
    assert (got[:, want.shape[1]:] == config["eos_token_id"]).all()   # pad = eos, as HF
    assert (want[:, 4:] == config["eos_token_id"]).any(axis=1).sum() == 1


def test_hub_directory_round_trip(tmp_path):
    """fnn writes a hub directory transformers loads (equal logits), and reads the one
    transformers writes (one file and sharded)."""
    x = ids((1, 7))
    for case in ("gpt2", "llama"):
        module, hf, config = reference(case)
        model, params, state, _ = to_fnn(module, hf, config)
        want = hf(torch.from_numpy(x)).logits.detach().numpy()
        models.save_pretrained(tmp_path / case, model, params, state)
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / case,
                                                                 dtype=torch.float64)
        np.testing.assert_allclose(float64_llama(back.eval())(torch.from_numpy(x)).logits
                                   .detach().numpy(), want, rtol=0, atol=1e-12)
        for sub, shard in (("one", "5GB"), ("sharded", "20KB")):
            hf.save_pretrained(tmp_path / f"{case}-{sub}", max_shard_size=shard)
            m2, p2, _ = models.from_pretrained(tmp_path / f"{case}-{sub}")
            assert module.hf_config(m2) == module.hf_config(model)
            jax.tree.map(np.testing.assert_array_equal, p2, params)


def test_wrong_state_dicts_are_reported():
    """A Llama state_dict given to GPT-2 and a GPT-2 one with a transposed c_attn fail loudly."""
    module, hf, config = reference("gpt2")
    model = module.from_hf_config(config)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    bad = {**sd, "transformer.h.0.attn.c_proj.weight":
           sd["transformer.h.0.attn.c_proj.weight"][:, :8]}
    with pytest.raises(StateDictError, match="c_proj.weight"):
        load_state_dict(model, bad, (1, 8))
    with pytest.raises(StateDictError, match="lm_head.weight"):
        load_state_dict(model, {**sd, "lm_head.weight": sd["lm_head.weight"] + 1}, (1, 8))
