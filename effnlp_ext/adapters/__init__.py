"""Adaptable adapters: rational activations, bottleneck adapters with per-layer switches.

modules.py: RationalActivation (the ``rational`` op), Adapter, LayerSwitch and the temperature
schedule; fits.py: least-squares rational fits of familiar functions (initialisation);
convert.py: add_adapters (Pfeiffer placement in HF BERT-family models, PLM frozen),
prune_adapters, saving/loading; benchmark.py: the ``rational`` op against torch compositions.
"""
from .convert import (AdaptedOutput, adapted_outputs, adapter_parameter_count, adapter_state_dict,
                      add_adapters, keep_layers, load_adapted, load_adapter_state, prune_adapters, switch_choices,
                      trainable_parameter_names)
from .fits import APPROXIMATIONS, fit_error, fit_rational, rational_init
from .modules import (CHOICES, Adapter, LayerSwitch, RationalActivation,
                      expected_adapter_fraction, make_activation, set_temperature,
                      temperature_schedule)

__all__ = [
    "APPROXIMATIONS", "AdaptedOutput", "Adapter", "CHOICES", "LayerSwitch", "RationalActivation",
    "adapted_outputs", "adapter_parameter_count", "adapter_state_dict", "add_adapters",
    "expected_adapter_fraction", "fit_error", "keep_layers",
    "fit_rational", "load_adapted", "load_adapter_state", "make_activation", "prune_adapters",
    "rational_init", "set_temperature", "switch_choices", "temperature_schedule",
    "trainable_parameter_names",
]
