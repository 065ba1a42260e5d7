"""PuXIM's losses (see ``puxim_losses``); ``build_criterion(config)`` is the builder."""
from .puxim_losses import (PAPER_TERMS, InstanceLoss, MatchingLoss, PuXIMCriterion, ReconstructionLoss, SeenClassLoss,
                           TripletLoss, build_criterion, cosine_distance, symmetric_infonce)

__all__ = ["TripletLoss", "InstanceLoss", "SeenClassLoss", "ReconstructionLoss", "MatchingLoss", "PuXIMCriterion",
           "build_criterion", "cosine_distance", "symmetric_infonce", "PAPER_TERMS"]
