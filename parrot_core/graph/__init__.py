"""Semantic variables, nodes, request chains and the DAG. Pure data: no engines, no I/O."""

from parrot_core.graph.graph import ComputeGraph
from parrot_core.graph.namespace import GLOBAL_SCOPE, Namespace
from parrot_core.graph.nodes import (
    CompletionChain,
    ConstantFill,
    FillNode,
    NativeFuncNode,
    PlaceholderFill,
    PlaceholderGen,
    TaskGroup,
)
from parrot_core.graph.request import Parameter, RequestChain, RequestMetadata, check_request, parse_request
from parrot_core.graph.template import PlaceholderChunk, TextChunk, parse_template
from parrot_core.graph.variable import PerfCriteria, SemanticVariable

__all__ = [
    "GLOBAL_SCOPE",
    "CompletionChain",
    "ComputeGraph",
    "ConstantFill",
    "FillNode",
    "Namespace",
    "NativeFuncNode",
    "Parameter",
    "PerfCriteria",
    "PlaceholderChunk",
    "PlaceholderFill",
    "PlaceholderGen",
    "RequestChain",
    "RequestMetadata",
    "SemanticVariable",
    "TaskGroup",
    "TextChunk",
    "check_request",
    "parse_request",
    "parse_template",
]
