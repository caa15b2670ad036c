"""The ``edgeqlora`` subcommands, one module each, looked up by name in ``edgeqlora.cli.COMMANDS``.

A command module provides ``HELP`` (its line in ``edgeqlora --help``), ``add_arguments(parser)``
and ``run(args) -> int``: parse, call one library function, print the result. A module imports
only the standard library at the top; the library it drives (torch for train, a runtime for run)
loads inside ``run``, so building the parser never pulls in a heavy dependency.
"""
