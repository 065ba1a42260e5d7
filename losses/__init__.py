"""PuXIM's losses (see ``puxim_losses``); ``build_criterion(args)`` is the builder."""
from .puxim_losses import (DEFAULT_WEIGHTS, TRIPLET_DISTANCES, InstanceLoss, MatchingLoss, PuXIMCriterion, ReconstructionLoss,
                           TripletLoss, build_criterion, cosine_distance, default_distance)

__all__ = ["TripletLoss", "InstanceLoss", "ReconstructionLoss", "MatchingLoss", "PuXIMCriterion", "build_criterion",
           "cosine_distance", "default_distance", "DEFAULT_WEIGHTS", "TRIPLET_DISTANCES"]
