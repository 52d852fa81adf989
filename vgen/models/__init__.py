"""vgen's own networks (video super-resolution, LaMamba U-Net, Motion2VecSets) land here."""
