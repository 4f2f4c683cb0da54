"""A griffe extension: the names a package imports on first use (its `_LAZY` table, read by a module `__getattr__`)
become aliases griffe can follow, so that `::: kred.Client` documents kred.client.client.Client under its public
name. Loaded by mkdocstrings (mkdocs.yml, `extensions`)."""
from __future__ import annotations

import ast

import griffe


class LazyNames(griffe.Extension):
    def on_module_members(self, *, mod: griffe.Module, **kwargs) -> None:
        table = mod.members.get("_LAZY")
        if table is None or not isinstance(table, griffe.Attribute) or table.value is None:
            return
        for name, module in ast.literal_eval(str(table.value)).items():
            if name not in mod.members:                     # a name defined in the module itself wins
                target = (mod.path + module if module.startswith(".") else module) + "." + name
                mod.set_member(name, griffe.Alias(name, target, parent=mod))
