"""Offloading: where the models live during a pipeline-path run (the Sampler's ``offload`` setting).

Modes:

* ``off`` — every model stays on the compute device (fastest; needs the most VRAM).
* ``budget`` — the placement follows the work: text encoders, projector and VAE come to the device only
  for their phase (T5's blocks stream when T5 does not fit the budget; the VAE decodes one image at a
  time, tiled when one decode would not fit); of the transformer, as many blocks (each with its
  character-attention layer) stay resident as the VRAM budget allows, and the rest stream from pinned
  host memory one block ahead of use on a side CUDA stream. The budget counts what lives on the device:
  the rest of the transformer, the kept blocks, the streaming buffers (two per block size; with fp8 also
  the compute-dtype copies), the allocator's rounding and a reserve for activations.
* ``sequential`` — the slow floor: every block comes to the device only while it runs, no prefetch.
* ``auto`` — picks one of the above from the free VRAM.

``fp8`` storage keeps the transformer and character-attention weights as float8_e4m3fn (half the bytes
to hold or stream) and computes in the model dtype; the fp8 copies are made once and kept with the model.

One job per module: :mod:`.layout` (a part's flat form), :mod:`.planner` (every byte count and choice; no
CUDA), :mod:`.host_packs` (the flat host buffers and their page-locking), :mod:`.streams` (the compute and copy
streams and their events), :mod:`.streamer` (blocks brought to the device around their use) and
:mod:`.placement` (the phases of a run, coordinating the others).
"""
