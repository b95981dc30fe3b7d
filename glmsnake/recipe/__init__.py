"""Config -> slime's command: argument groups as typed models (args.py), then the driver (command.py)."""

from glmsnake.recipe.command import GROUP_ORDER, Driver, driver, driver_factory, groups, render_text, sglang_args

__all__ = ["GROUP_ORDER", "Driver", "driver", "driver_factory", "groups", "render_text", "sglang_args"]
