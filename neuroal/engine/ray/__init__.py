"""The Ray executor (``engine.executor=ray``), one module per concern:

* :mod:`~neuroal.engine.ray.options`: the lazy ``import ray``, connecting to a cluster, what every
  actor starts with (:class:`~neuroal.engine.ray.options.RayOptions`, its environment and device).
* :mod:`~neuroal.engine.ray.actor`: the functions that run inside an actor (set-up, facts, the
  stage of a pass over the actor's slice).
* :mod:`~neuroal.engine.ray.transport`: how a stream crosses between actors (object store, or a
  gloo / NCCL transfer by Ray Direct Transport).
* :mod:`~neuroal.engine.ray.faults`: restarting dead actors and restoring their state.
* :mod:`~neuroal.engine.ray.data`: data mode (``engine.parallel=data``): the final prune, the
  dense statistics pass and the search's dense reference.
* :mod:`~neuroal.engine.ray.executor`: :class:`~neuroal.engine.ray.executor.RayExecutor` itself
  (placement, actors, the pipelined passes of the executor protocol).

:mod:`neuroal.engine.ray_executor` re-exports the public names (the stable import path). None of
these modules imports Ray at module level, so importing the engine needs no Ray.
"""
