"""Running it: generation on the pipeline path (in phases, with offloading and style LoRAs), the characters on
ComfyUI's native MODEL, regions, storyboards, and the checks and quiet mode of a first run."""
