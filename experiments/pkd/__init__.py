"""The PKD experiment (Medina et al., arXiv 2503.01727): a Mamba teacher distilled into a progressive, anytime
ensemble of small Mamba students on Fashion-MNIST (sklearn digits for the smoke preset)."""
