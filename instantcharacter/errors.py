"""Exception types whose messages tell the user what to do."""


class InstantCharacterError(Exception):
    """Base class of every error this package raises on purpose."""


class AdapterFileError(InstantCharacterError, ValueError):
    """The adapter file is missing, unreadable, or not an InstantCharacter adapter."""


class ModelFolderError(InstantCharacterError, FileNotFoundError):
    """A model folder is missing files or holds a different model."""


class DownloadError(InstantCharacterError, RuntimeError):
    """A download could not be completed; the message says what to do instead."""


class InputError(InstantCharacterError, ValueError):
    """A generation setting or an input image is not usable."""


class LoraFileError(InstantCharacterError, ValueError):
    """A style LoRA file is missing, unreadable, or not a LoRA for FLUX.1."""


class UnsupportedModelError(InstantCharacterError, TypeError):
    """A MODEL is not FLUX.1-dev as InstantCharacter needs it, or ComfyUI's FLUX blocks are not built as this
    pack expects; the message names what differs."""


class CharacterFileError(InstantCharacterError, ValueError):
    """A character file is missing, unreadable, or not a character file of this pack; nothing was loaded."""


class NonFiniteResultError(InstantCharacterError, ArithmeticError):
    """A run produced NaN or infinite values (latents, character tokens or decoded pixels) and was stopped before
    anything was written; the message names the input that is out of its plausible range."""
