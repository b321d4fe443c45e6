"""backdoor-prune: remove backdoors from neural networks by pruning (Fine-Pruning, CSAW-HackML Lab 3)."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes, grappler notes) hides the results;
# users who want it back set TF_CPP_MIN_LOG_LEVEL=0 themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
