"""Tensors → frames: audio features, the SyncTalk_2D networks, engines and their autotuning, avatars, compositing,
the pipeline that chains them, and the synthetic demo model. Imports only codec and the foundation."""
