"""lipcert: 1-Lipschitz CNNs and their deterministic l2 robustness certificates.

After Singla & Feizi, "Improved techniques for deterministic l2 robustness" (NeurIPS 2022).
"""

__version__ = "0.1.0"
