"""Everything that reads or writes the disk: checkpoints and model files (FLUX, encoders, adapter, LoRAs, ComfyUI's
single files), saved characters, storyboard folders, downloads and where the models live."""
