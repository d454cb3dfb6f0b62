"""The spec: envs/*.toml read into typed data (model), the rules in effect for
one (arch, stack) as the resolver's inputs (rules), and the stack knowledge
(knowledge). `load(root)` is the entry point; nothing here touches the network
or an environment.
"""

from .load import load
from .model import Arch, Knowledge, Model, Rule, Spec, Stack
from .rules import Inputs, inputs, launch_profile, rules_in_effect

__all__ = ["load", "Arch", "Knowledge", "Model", "Rule", "Spec", "Stack", "Inputs", "inputs", "launch_profile",
           "rules_in_effect"]
