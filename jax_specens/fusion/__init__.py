"""CoSD knowledge fusion: per-position features, rule / tree / learned verifiers, fusion heads."""

from jax_specens.fusion.cross import CrossOutput, CrossStats, SidePrompts, cosd_text
from jax_specens.fusion.features import (argmax_features, check_features, feature_names,
                                         num_features, position_features, translated_features)
from jax_specens.fusion.harvest import Harvest, harvest_texts, harvest_tokens
from jax_specens.fusion.head import (FusionHead, FusionHeadFn, HeadConfig, init_head, load_head,
                                     save_head)
from jax_specens.fusion.learned import LearnedEnsemble, learned_ensemble
from jax_specens.fusion.pipeline import FusionRecipe, train_fusion
from jax_specens.fusion.rule import RuleVerifier, rule_replace
from jax_specens.fusion.tree import TreeVerifier, fit_tree
from jax_specens.fusion.verifier import VERIFIERS, ConstantVerifier, as_verifier, load_verifier
