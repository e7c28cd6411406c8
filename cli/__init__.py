"""The `outpost` command: assembles each package's commands, owns none."""
