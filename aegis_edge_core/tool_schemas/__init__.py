"""JSON Schemas (draft 2020-12) of the built-in tools' arguments and results.

``<tool>.args.json`` describes ``CommandInvocation.args_json``; ``<tool>.result.json``
describes ``CommandResult.result_json`` (an empty string reads as ``{}``). They are the
contract other implementations build against; :mod:`aegis_edge_core.tools_spec` loads them,
and docs/tools.md is rendered from them (``scripts/gen_tool_docs.py``).
"""
