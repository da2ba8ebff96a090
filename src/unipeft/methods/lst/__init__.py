"""Ladder Side-Tuning (LST, Sung et al. 2022) with SHERL's anti-redundancy consolidation as an option.

A small side network reads the frozen backbone's block outputs (detached) through ladders and adds its
up-projected result before the task head, so backpropagation never enters the backbone. plan.py finds the
layer list and the sites; side.py holds the side network (the adapter's bank) and the per-site delta.
Not mergeable (the side network is non-linear in the hidden states), no mixed batches (one side state per call);
the backbone may be quantized (its blocks are read, never changed).
"""
from ...core.registry import Capabilities, register
from .plan import LadderModule, LstConfig, find_layer_list, is_ladder_site, ladder_plan
from .side import LstBank, LstDelta, anti_redundancy_weights, consolidate

register("lst", LstConfig, LstDelta, Capabilities(mergeable=False, mixed_batch=False, layer_types=(LadderModule,),
                                              quantized_base=True),
         default_targets=is_ladder_site)

__all__ = ["LstConfig", "LstDelta", "LstBank", "anti_redundancy_weights", "consolidate", "find_layer_list", "ladder_plan"]
