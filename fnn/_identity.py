"""Identity as a hashable value, shared by the layers' structural identity (``fnn.core``) and
the compiled-epoch cache's fingerprints (``fnn.train.cache``)."""


class Same:
    """Equal only to a wrapper of the same object (which it keeps alive); hashes by ``id``."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)
