"""Run the whole stack locally: tritonserver with the CPU models, the orchestrator and the edge."""

from tokenrelay.stack._stack import Stack, StackError, StackPorts, TritonProcess, free_port
from tokenrelay.stack._triton import TritonPorts

__all__ = ["Stack", "StackError", "StackPorts", "TritonPorts", "TritonProcess", "free_port"]
