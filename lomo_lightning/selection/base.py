"""The seam between a selection and the fused engine.

A selection either freezes whole tensors (``requires_grad=False``, nothing else needed) or routes the
dense gradient of a model weight to a smaller tensor that the optimizer owns (sparse fine-tuning). The
engine never knows which selection it serves: it only follows the routes found on the model.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

ROUTES_ATTRIBUTE = "_lomo_gradient_routes"


class GradientRoute(Protocol):
    """Sends the dense gradient of ``source`` (a model weight) to ``target`` (a tensor the optimizer owns).

    ``target`` is what sits in the optimizer's ``param_groups``; ``source`` is what sits in the model
    under ``name`` (relative to the module the route is registered on) and receives the gradient in backward. After the update rule has changed ``target``, ``scatter``
    writes it back into ``source``.
    """

    name: str
    source: nn.Parameter
    target: Tensor

    def bind(self, source: nn.Parameter) -> None:
        """Take ``source`` as the current parameter named ``name`` (``fully_shard`` and ``.to()`` replace it)."""
        ...

    def gather(self, grad: Tensor) -> Tensor:
        """Return the gradient of ``target`` given the dense gradient of ``source`` (may record statistics)."""
        ...

    def peek(self, grad: Tensor) -> Tensor:
        """What :meth:`gather` returns, without recording anything (the norm-measuring pass uses it)."""
        ...

    def scatter(self) -> None:
        """Write ``target`` into ``source`` after the update rule ran."""
        ...


def gradient_routes(model: nn.Module) -> dict[Tensor, GradientRoute]:
    """All routes registered on ``model`` or any of its submodules, keyed by their source parameter.

    Each route is first bound to the parameter its module holds now: ``fully_shard`` replaces parameters
    with shards, and a route left on the old one would miss every gradient and keep the full weight alive.
    """
    routes: dict[Tensor, GradientRoute] = {}
    for module in model.modules():
        for route in getattr(module, ROUTES_ATTRIBUTE, ()):
            current = module.get_parameter(route.name)
            if current is not route.source:
                route.bind(current)
            routes[route.source] = route
    return routes


def register_routes(module: nn.Module, routes: list[GradientRoute]) -> None:
    """Attach ``routes`` to ``module`` so that :func:`gradient_routes` finds them."""
    object.__setattr__(module, ROUTES_ATTRIBUTE, list(routes))


