"""Test-wide settings."""
import torch

# The tests' populations are tiny: a second torch thread costs more in
# synchronisation than it gains, and on a shared 2-core machine it can stall
# behind another process (a 1 ms step measured at up to 260 ms).
torch.set_num_threads(1)
