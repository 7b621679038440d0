"""Make the top-level modules importable however pytest is started, and run tests on one thread.

Tests use tiny models, for which one thread is faster than two (no synchronisation) and which
stay fast when the machine is busy.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
