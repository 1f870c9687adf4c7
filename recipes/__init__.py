"""The shipped recipes: `rlrf recipes` lists them, `--recipe <name>` finds one here when no such file exists."""
