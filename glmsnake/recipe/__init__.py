"""Config -> slime/Megatron/SGLang arguments (design section 3)."""

from glmsnake.recipe.groups import GROUP_ORDER, Driver, driver, groups, render_text, sglang_args

__all__ = ["GROUP_ORDER", "Driver", "driver", "groups", "render_text", "sglang_args"]
