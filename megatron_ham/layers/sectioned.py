"""SectionedMixer: the tensor-parallel bookkeeping of a mixer whose parameters are split by heads.

A mixer of a layer kind (megatron_ham/layers/kinds) receives its kind and the ModelConfig
through its ModuleSpec params (`kind=`, `model_config=`). The kind's section table
(`kind.fused(cfg)`, a list of `Fused`) says which parameters are fused from named sections;
this base class turns that one table into
  - the TP split: `local_widths(param)`, this rank's rows of each section (units // tp each);
  - the layout-independent init: `init_fused(param, init)` draws every section in full from the
    default RNG (identical on all TP ranks) and keeps this rank's units, so a model initialises
    the same at any TP size;
  - the sectioned checkpoint: `sharded_state_dict` saves each fused parameter as named sections
    (`<param>.<section>`, each its own TP-sharded tensor), so a checkpoint is independent of the
    TP layout; parameters listed in `tp_split` (name -> axis) are saved TP-sharded as they are,
    every other parameter and buffer replicated (children: their own sharded_state_dict).
Layout: section-major per rank (this rank's rows of section 1, then section 2, ...).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from megatron.core.transformer.module import MegatronModule

from .tp_utils import section_factory


def tp_group_of(pg_collection):
    """The tensor-parallel group of `pg_collection` (Megatron's global one when None)."""
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        return pg_collection.tp
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def param_device(config) -> torch.device:
    """Where a mixer creates its own parameters (CPU with use_cpu_initialization or no CUDA)."""
    if getattr(config, "use_cpu_initialization", False) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class SectionedMixer(MegatronModule):
    """Base of mixers with head-split, sectioned parameters (see the module docstring).

    config: Megatron TransformerConfig; kind: its LayerKind; model_config: the ModelConfig;
    units: heads of the whole model (split over TP); pg_collection: Megatron's process groups.
    """

    #: parameters saved TP-sharded as they are (not sectioned): name -> partition axis
    tp_split: Dict[str, int] = {}

    def __init__(self, config, kind, model_config, units: int, pg_collection=None):
        super().__init__(config)
        self.config = config
        self.kind = kind
        self.model_config = model_config
        self.tp_group = tp_group_of(pg_collection)
        self.tp = self.tp_group.size() if self.tp_group is not None else 1
        self.tp_rank = self.tp_group.rank() if self.tp_group is not None else 0
        self.units = units
        self.units_local = units // self.tp
        self.fused = {f.param: f for f in kind.fused(model_config)}

    # ------------------------------------------------------------------ TP split
    def local_widths(self, param: str) -> List[int]:
        """This rank's rows of each section of the fused parameter `param`."""
        return self.fused[param].widths(self.units_local)

    def section_names(self, param: str) -> List[str]:
        return [s.name for s in self.fused[param].sections]

    def full_then_local(self, shape_per_unit, init: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Draw the FULL tensor [units * w, ...] (fp32) with `init` from the default RNG and
        return this rank's units."""
        w, rest = shape_per_unit[0], tuple(shape_per_unit[1:])
        full = torch.empty((self.units * w,) + rest, dtype=torch.float32)
        init(full)
        lo = self.tp_rank * self.units_local * w
        return full[lo: lo + self.units_local * w]

    @torch.no_grad()
    def init_fused(self, param: str, init: Callable[[torch.Tensor], None]) -> None:
        """Initialise the fused parameter `param` section by section, layout-independently."""
        f = self.fused[param]
        p = self.get_parameter(param)
        rest = tuple(p.shape[1:])
        local = [self.full_then_local((s.width,) + rest, init) for s in f.sections]
        p.data.copy_(torch.cat(local, 0).to(p.device))

    # ------------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, **kwargs):
        """TP-layout independent (see the module docstring)."""
        from megatron.core.transformer.utils import (
            make_sharded_tensors_for_checkpoint,
            sharded_state_dict_default,
        )

        metadata = _ensure_dp_cp(metadata)
        extra = {}
        if "dp_cp_group" in _msft_params():
            extra["dp_cp_group"] = metadata["dp_cp_group"]
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        taken = set()  # children whose parameters are saved here (TP-split as a whole)
        for name in self.tp_split:
            if "." in name:
                own[name] = self.get_parameter(name)
                taken.add(name.split(".")[0])
        sd = make_sharded_tensors_for_checkpoint(
            own, prefix, dict(self.tp_split), sharded_offsets, tp_group=self.tp_group, **extra
        )
        for name, child in self.named_children():
            if name in taken:
                continue
            sd.update(sharded_state_dict_default(
                child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group))
        for param in self.fused:
            key = f"{prefix}{param}"
            sd[key] = section_factory(sd[key], self.local_widths(param), self.section_names(param), 0)
        return sd


def _ensure_dp_cp(metadata):
    from megatron.core import parallel_state

    metadata = dict(metadata) if metadata else {}
    if "dp_cp_group" not in metadata:
        metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _msft_params():
    import inspect

    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    return inspect.signature(make_sharded_tensors_for_checkpoint).parameters
