"""The shipped recipe files (``<name>.toml``): the settings of each row of the
paper's tables (SPEC section 4), read by ``ater-train --config NAME`` and
``ater-sweep NAME``; see :mod:`ater_ext.cli.recipes` for the format."""
