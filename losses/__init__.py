"""PuXIM's losses (see ``puxim_losses``); ``build_criterion(args)`` is the builder."""
from .puxim_losses import (DEFAULT_WEIGHTS, TRIPLET_DISTANCES, InstanceLoss, MatchingLoss, PuXIMCriterion,
                           ReconstructionLoss, SeenClassLoss, TripletLoss, build_criterion, cosine_distance,
                           default_distance, symmetric_infonce)

__all__ = ["TripletLoss", "InstanceLoss", "SeenClassLoss", "ReconstructionLoss", "MatchingLoss", "PuXIMCriterion",
           "build_criterion", "cosine_distance", "default_distance", "symmetric_infonce", "DEFAULT_WEIGHTS",
           "TRIPLET_DISTANCES"]
