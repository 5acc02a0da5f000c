"""What patched transformers code imports at run time: the carrier of the K/V that KV-shared layers read."""

from __future__ import annotations

from collections import UserDict


class KVSharingDict(UserDict):
    """transformers 5.23.0's ``cache_utils.KVSharingDict``: layer index -> the K/V tensors KV-shared layers reuse.

    Two wrappers around decoder layers copy the mappings they are given, so a plain dict loses what one layer stores
    before the next reads it (``KeyError``). FSDP2's mixed precision rebuilds every ``dict``: this is not one.
    accelerate's device hooks (a ``device_map`` over several devices, or offloading) rebuild every mapping unless it
    has a ``to()``: this one's moves the tensors in place and returns the same object.
    """

    def to(self, device, non_blocking: bool = False) -> KVSharingDict:
        for key in list(self):
            self[key] = tuple(tensor.to(device, non_blocking=non_blocking) for tensor in self[key])
        return self
