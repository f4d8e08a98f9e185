"""Pure loss functions of tensors: token-level divergences, hidden-state and attention matching,
balancing and schedules. They know nothing of models or training loops (see docs/losses.md)."""

from distillery.losses.attention import (attention_map_loss, attention_maps_loss, attention_probs_from_qk,
                                         capture_representations, eager_attention, even_attention_pairs)
from distillery.losses.balance import LossBalancer
from distillery.losses.divergences import (DIVERGENCES, TAILS, divergence_from_logprobs, generalized_jsd,
                                           token_kd_loss, token_kd_loss_from_hidden)
from distillery.losses.hidden import (ProjectionHeads, check_layer_map, even_layer_map, hidden_state_loss,
                                      hidden_states_loss)
from distillery.losses.schedules import Ramp, constant, curriculum, temperature_annealing

__all__ = [
    "DIVERGENCES", "TAILS", "LossBalancer", "ProjectionHeads", "Ramp", "attention_map_loss", "attention_maps_loss",
    "attention_probs_from_qk", "capture_representations", "check_layer_map", "constant", "curriculum",
    "divergence_from_logprobs", "eager_attention", "even_attention_pairs", "even_layer_map", "generalized_jsd",
    "hidden_state_loss", "hidden_states_loss", "temperature_annealing", "token_kd_loss", "token_kd_loss_from_hidden",
]
