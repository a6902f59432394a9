"""How an activation stream crosses from one Ray actor to the next (``engine.ray.transport``,
docs/transport.md): through the object store (:class:`ObjectStoreTransport`) or by Ray Direct
Transport, one gloo or NCCL transfer in a Ray collective group (:class:`DirectTransport`);
:func:`resolve_transport` picks one before any actor loads its slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from neuroal.engine.ray.actor import _drop_process_group, _ping
from neuroal.engine.ray.options import _describe, import_ray
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)


class ObjectStoreTransport:
    """The fallback (engine.md §3.3, transport v1): the stream a stage returns is stored in the
    object store where its producer runs, and Ray resolves the ObjectRef on the consumer's node
    (device -> host -> store -> host -> device; lossless, byte-exact)."""

    name = "object-store"
    device: str | None = None  # streams on any device

    def available(self) -> bool:
        return True

    def options(self) -> dict[str, Any]:
        """Options of a call whose return value is a stream for the next actor."""
        return {}

    def connect(self, actors: Sequence[Any]) -> Any:
        """Set up the actors' channel (none needed); a handle for :meth:`disconnect`."""
        return None

    def disconnect(self, handle: Any) -> None:
        """Tear down what :meth:`connect` made, so :meth:`connect` can run again."""

    def release(self, handle: Any) -> None:
        """Forget what :meth:`connect` made on the driver (the actors are being killed)."""


class DirectTransport:
    """Ray Direct Transport: a stage's returned stream stays on its actor's device and crosses
    to the next actor as one point-to-point transfer in a Ray collective group (``gloo``
    between CPU actors, ``nccl`` between CUDA actors), never through the object store or the
    driver. The call is marked with Ray's ``tensor_transport`` option at submission (the
    call-time form of ``@ray.method(tensor_transport=...)``), so the Worker stays plain."""

    def __init__(self, name: str, device: str) -> None:
        self.name = name
        self.device = device  # the one device type of the streams this backend moves

    def available(self) -> bool:
        """Whether Ray's collective backend can start (nccl needs cupy, gloo torch's gloo)."""
        import_ray()
        from ray.util import collective

        return bool(collective.is_backend_available(self.name))

    def options(self) -> dict[str, Any]:
        return {"tensor_transport": self.name}

    def connect(self, actors: Sequence[Any]) -> Any:
        """A fresh collective group over ``actors`` (rank = slice index), once every actor
        answers a ping: with a dead actor the rendezvous (torch.distributed's ``env://``
        init inside Ray's gloo group) would hold the live ones for torch's default timeout
        (30 min), and no call, not even the executor's liveness ping, reaches them meanwhile.
        The ping raises the dead actor's death at once, which the executor's retry turns into
        a restart. (An actor that dies during the rendezvous itself still holds its peers.)

        Raises:
            ray.exceptions.ActorDiedError: An actor is dead.
        """
        from ray.experimental.collective import create_collective_group

        ray = import_ray()
        ray.get([actor.__ray_call__.remote(_ping) for actor in actors])
        return create_collective_group(list(actors), backend=self.name)

    def disconnect(self, handle: Any) -> None:
        """Tear the group down on the driver and in the live actors (after a restart): Ray's
        gloo group sits on each actor's default torch.distributed group, which must go too, or
        a new group over a restarted actor never meets."""
        if handle is None:
            return
        self.release(handle)
        ray = import_ray()
        for actor in handle.actors:
            try:
                ray.get(actor.__ray_call__.remote(_drop_process_group), timeout=DROP_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError) as exc:  # dead: it holds nothing
                log.debug("collective group %s: %s", handle.name, _describe(exc))

    def release(self, handle: Any) -> None:
        """Forget the group on the driver and in the live actors (dead ones are skipped)."""
        if handle is None:
            return
        from ray.experimental.collective import destroy_collective_group

        try:
            destroy_collective_group(handle)
        except (import_ray().exceptions.RayError, ValueError) as exc:
            # an actor died (it holds nothing more), or Ray already dropped the group after a
            # failed transfer
            log.debug("collective group %s: %s", handle.name, _describe(exc))


TRANSPORTS: dict[str, ObjectStoreTransport | DirectTransport] = {
    "object-store": ObjectStoreTransport(), "gloo": DirectTransport("gloo", "cpu"),
    "nccl": DirectTransport("nccl", "cuda")}
DROP_TIMEOUT_S = 60.0  # leaving a collective group inside a live actor
AUTO_ORDER = ("nccl", "gloo", "object-store")  # engine.ray.transport=auto: first that fits
FIXES = {"nccl": "pip install cupy-cuda12x (Ray's NCCL backend) on every node",
         "gloo": "use a torch build with gloo (torch.distributed.is_gloo_available())"}


def resolve_transport(name: str, stream_device: str) -> ObjectStoreTransport | DirectTransport:
    """The transport ``engine.ray.transport=name`` runs for streams on ``stream_device``
    (``cpu``, also CUDA runs with ``engine.offload_activations``; or ``cuda``); ``auto``: nccl
    for CUDA streams, gloo for CPU streams, each only where available, else the object store.

    Raises:
        ValueError: An unknown name, or a transport that cannot move these streams here
            (checked before any actor loads its slice).
    """
    if name == "auto":
        return next(t for t in (TRANSPORTS[n] for n in AUTO_ORDER)
                    if t.device in (None, stream_device) and t.available())
    if name not in TRANSPORTS:
        raise ValueError(f"engine.ray.transport={name!r}: expected auto or one of "
                         f"{', '.join(TRANSPORTS)}")
    transport = TRANSPORTS[name]
    if transport.device not in (None, stream_device):
        raise ValueError(f"engine.ray.transport={name}: moves {transport.device} tensors, but the "
                         f"activation streams live on {stream_device}; use "
                         f"engine.ray.transport=auto (or "
                         f"{'nccl' if stream_device == 'cuda' else 'gloo'}, or object-store)")
    if not transport.available():
        raise ValueError(f"engine.ray.transport={name}: Ray's {name} collective backend is not "
                         f"available in this environment; {FIXES.get(name, '')}, or use "
                         "engine.ray.transport=auto or object-store")
    return transport
