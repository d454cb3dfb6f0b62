"""Host facts: CPU and ISA, NUMA, memory, disk (cpu.py), GPUs and driver (gpu.py), live or recorded (facts.py)."""
