"""From pictures to characters: preparing reference pictures, the image encoders, what a CHARACTER carries, and the
consistency score."""
