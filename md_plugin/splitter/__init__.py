"""CNNSplitter: split a strong CNN into per-class modules (kernel subsets) by a genetic search,
and patch a weak model's target class with one of them.

from md_plugin.splitter import modularize, SplitModules
mods = modularize(model, val_loader, classes=[0, 1, 2, 3, 4], generations=30)
mods.save("modules.safetensors")
mods = SplitModules.load("modules.safetensors", model)   # refuses another model
net = mods.module(3)            # masked strong model; logit 3 is the module's output
"""

from .encoding import GeneLayout, create_gene_layout
from .extract import count_cost, extract_module
from .fitness import jaccard_distances, pruning_evaluation, score_ensemble
from .groups import ChannelGroup, SplitGraph, UnsupportedArchitecture, create_split_graph
from .importance import Importance, compute_importance
from .masking import MaskedModel, create_masked_model
from .modules import SplitModules, create_split_modules, modules_from_diagnosis
from .patch import PatchedModel, evaluate_patch, own_class_range, tc_metrics
from .search import SearchConfig, SearchResult, run_search
from .split import modularize

__all__ = [
    "ChannelGroup",
    "GeneLayout",
    "Importance",
    "MaskedModel",
    "PatchedModel",
    "SearchConfig",
    "SearchResult",
    "SplitGraph",
    "SplitModules",
    "UnsupportedArchitecture",
    "compute_importance",
    "count_cost",
    "create_gene_layout",
    "create_masked_model",
    "create_split_graph",
    "create_split_modules",
    "evaluate_patch",
    "extract_module",
    "jaccard_distances",
    "modularize",
    "modules_from_diagnosis",
    "own_class_range",
    "pruning_evaluation",
    "run_search",
    "score_ensemble",
    "tc_metrics",
]
