"""Evaluation of generative models: the TF-Inception FID network in Flax (``inception``), its
weight converter (``convert_inception``), the Inception Score's classifier (``classifier``), the
metric math: FID, sFID, precision/recall, KID and the Inception Score (``fid``), and the modes
that use them (``evaluate``)."""
