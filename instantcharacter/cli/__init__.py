"""The command line, one module per command (:mod:`.generate`, :mod:`.doctor`, :mod:`.storyboard`) and what they
share (:mod:`.common`); ``python -m instantcharacter`` (:mod:`..__main__`) parses the arguments and runs one."""
