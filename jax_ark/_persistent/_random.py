"""Random numbers inside ark.persistent: PRNG keys become their raw uint32 data.

jax keeps a PRNG key as a value of an extended dtype (key<fry>) and draws with primitives
(random_bits, random_split, random_fold_in) that XLA expands late, when it lowers them. The
planner only sees 32-bit tensors, so `without_keys` rewrites a jaxpr first: every key value becomes
its uint32[..., 2] key data, the random primitives become jax's own threefry implementation of
them (traced, so the counter layout follows the `jax_threefry_partitionable` setting as jax.jit
does), and the threefry2x32 hash and the counter iota become plain uint32 adds, shifts and xors,
which the tracer plans like any integer code. Same bits as jax.jit.

Supported: threefry keys (jax's default), passed in as raw key data (`jax.random.PRNGKey`) or as
typed keys (`jax.random.key`: `key_data_arguments` passes their data through the FFI call and
wraps it again inside fn), or seeded inside fn (random_seed: jax's threefry seeding, traced);
split, fold_in, and the draws built on 32-bit random_bits (uniform, bernoulli, randint,
categorical, flax's dropout), also in scan / while_loop / cond bodies, with one key or an array
of keys (vmap over split keys, also through a vmapped while_loop). Anything else that touches a
key is refused by name (jax.random.gamma / beta / dirichlet: a while loop inside a while loop).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry_prng_impl

_RANDOM = frozenset(
    {
        "random_wrap", "random_unwrap", "random_bits", "random_split", "random_fold_in",
        "random_seed", "threefry2x32", "iota_2x32_shape",
    }
)  # fmt: skip
# Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): 20
# rounds, a key injection every 4, rotation amounts alternating between these two sets.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA


def _is_key(x) -> bool:
    """Whether x (an array or an abstract value) is a typed PRNG key."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _sub_jaxprs(eqn) -> list:
    out = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                out.append(item)
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                out.append(item.jaxpr)
    return out


def _uses_keys(jaxpr) -> bool:
    """Whether jaxpr takes or returns a key, or any eqn of it (or of a jaxpr inside it) is random
    or has a key operand."""
    if any(_is_key(v.aval) for v in (*jaxpr.invars, *jaxpr.outvars)):
        return True
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _RANDOM:
            return True
        if any(_is_key(v.aval) for v in (*eqn.invars, *eqn.outvars)):
            return True
        if any(_uses_keys(sub) for sub in _sub_jaxprs(eqn)):
            return True
    return False


def _rotate_left(x, r: int):
    return lax.shift_left(x, np.uint32(r)) | lax.shift_right_logical(x, np.uint32(32 - r))


def _threefry2x32(k1, k2, x1, x2):
    """The threefry2x32 hash of counters (x1, x2) under key (k1, k2), elementwise, broadcast."""
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in (k1, k2, x1, x2)))
    k1, k2, x1, x2 = (jnp.broadcast_to(jnp.asarray(v, jnp.uint32), shape) for v in (k1, k2, x1, x2))
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(_KEY_PARITY))
    x = [x1 + ks[0], x2 + ks[1]]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x[0] = x[0] + x[1]
            x[1] = x[0] ^ _rotate_left(x[1], r)
        x[0] = x[0] + ks[(block + 1) % 3]
        x[1] = x[1] + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x


def _iota_2x32(shape: tuple[int, ...]):
    """(high, low) 32-bit words of a row-major uint64 iota of `shape`."""
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:
        from jax_ark._persistent._trace import UnsupportedError

        raise UnsupportedError(
            f"ark.persistent: random bits of shape {shape} ({size} values) need 64-bit counters"
        )
    low = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        low = low + lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride)
        stride *= shape[d]
    return jnp.zeros(shape, jnp.uint32), low


# Ops that do not look at their operands' shape (a copy, shard_map's varying-type casts): bound
# as they are on the key data.
_SHAPELESS = frozenset(
    {"copy", "copy_p", "pvary", "pcast", "stop_gradient", "optimization_barrier"}
)


def _on_key_data(eqn, raw: Sequence[Any]) -> list | None:
    """A shape op on key arrays applied to their key data (one trailing dim of 2); None when eqn
    is not one."""
    name, params, x = eqn.primitive.name, eqn.params, raw[0]
    if name == "slice":
        strides = params.get("strides")
        return [
            lax.slice(
                x,
                (*params["start_indices"], 0),
                (*params["limit_indices"], 2),
                None if strides is None else (*strides, 1),
            )
        ]
    if name == "squeeze":
        return [lax.squeeze(x, params["dimensions"])]
    if name == "reshape" and params.get("dimensions") is None:
        return [jnp.reshape(x, (*params["new_sizes"], 2))]
    if name == "broadcast_in_dim":
        shape = tuple(params["shape"])
        return [lax.broadcast_in_dim(x, (*shape, 2), (*params["broadcast_dimensions"], len(shape)))]
    if name == "concatenate":
        return [lax.concatenate(list(raw), params["dimension"])]
    if name in _SHAPELESS:
        return bind_eqn(eqn, raw)
    return None


def _per_key(fn: Callable, lead: int) -> Callable:
    """fn of one key's data (and per-key arguments) mapped over `lead` leading dims of keys."""
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn


def bind_eqn(eqn, invals: Sequence[Any]) -> list:
    """eqn's primitive bound on invals with eqn's params (as jax.core.eval_jaxpr does)."""
    # get_bind_params: the params alone in jax 0.10 / 0.11, (subfuns, params) in older jax
    bind = eqn.primitive.get_bind_params(eqn.params)
    subfuns, bind = bind if isinstance(bind, tuple) else ((), bind)
    out = eqn.primitive.bind(*subfuns, *invals, **bind)
    return list(out) if eqn.primitive.multiple_results else [out]


def _user_context(source_info):
    """jax's context that gives what is bound inside it this source location (a no-op where jax's
    internals moved)."""
    try:
        from jax._src import source_info_util

        return source_info_util.user_context(source_info.traceback)
    except Exception:  # noqa: BLE001 - degrade to the rewrite's own frames
        return contextlib.nullcontext()


def _location(source_info) -> str:
    """The user's file:line of an eqn's source info ("" when jax attributes none)."""
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(source_info)
    except Exception:  # noqa: BLE001 - internals moved: no location rather than failing
        return ""


class _Rewriter:
    def __init__(self):
        # The source of the innermost eqn with a user location being rewritten: eqns of an
        # inlined body (jax.random's own jitted helpers) have none of their own, and what
        # replaces them should still name the user's line in errors and plan summaries.
        self.source = None

    def refuse(self, eqn, why: str):
        from jax_ark._persistent._trace import UnsupportedError

        where = _location(self.source) or "an unknown line"
        raise UnsupportedError(
            f"ark.persistent: {eqn.primitive.name} at {where}: {why}; draw the random values "
            "outside the function and pass them in"
        )

    def through(self, fn: Callable, *args):
        """fn (jax's implementation of a random primitive) traced on args and run through this
        rewrite, so the primitives it binds (threefry2x32, iota_2x32_shape) are expanded too."""
        closed = jax.make_jaxpr(fn)(*args)
        return self.eval(closed.jaxpr, closed.consts, list(args))

    def eval(self, jaxpr, consts, args) -> list:
        env: dict = {}

        def read(v):
            return v.val if type(v).__name__ == "Literal" else env[v]

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        for eqn in jaxpr.eqns:
            outer = self.source
            if _location(eqn.source_info) or outer is None:
                self.source = eqn.source_info
            try:
                with _user_context(self.source):
                    outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            finally:
                self.source = outer
            for v, x in zip(eqn.outvars, outs, strict=True):
                if type(v).__name__ != "DropVar":
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, invals: list) -> list:
        from jax_ark._persistent._trace import _call_body

        name, params = eqn.primitive.name, eqn.params
        if name == "random_wrap":
            if params["impl"] is not threefry_prng_impl:
                self.refuse(eqn, f"only threefry keys are supported, not {params['impl']}")
            return [jnp.asarray(invals[0], jnp.uint32)]
        if name == "random_unwrap":
            return [invals[0]]
        if name in ("random_bits", "random_split", "random_fold_in"):
            # An array of keys (vmap over split keys) draws with each key as jax's batching rules
            # do: the single-key implementation vmapped over them.
            lead = jnp.ndim(invals[0]) - 1
            if name == "random_bits":
                bits, shape = params["bit_width"], tuple(params["shape"])  # per key
                if bits != 32:
                    self.refuse(eqn, f"{bits}-bit draws are not supported (32-bit only)")
                draw = threefry_prng_impl.random_bits
                return self.through(_per_key(lambda k: draw(k, bits, shape), lead), invals[0])
            if name == "random_split":
                shape = tuple(params["shape"])
                split = _per_key(lambda k: threefry_prng_impl.split(k, shape), lead)
                return self.through(split, invals[0])
            data = jnp.broadcast_to(invals[1], jnp.shape(invals[0])[:-1])
            return self.through(_per_key(threefry_prng_impl.fold_in, lead), invals[0], data)
        if name == "random_gamma":  # jax.random.gamma / beta / dirichlet
            self.refuse(
                eqn,
                "jax's gamma sampler is a rejection while_loop inside another one, and ark plans "
                "while loops only at top level",
            )
        if name == "random_seed":  # jax.random.key(seed) / PRNGKey(seed) inside the function
            if params["impl"] is not threefry_prng_impl:
                self.refuse(eqn, f"only threefry keys are supported, not {params['impl']}")
            return self.through(threefry_prng_impl.seed, invals[0])
        if name == "threefry2x32":
            return _threefry2x32(*invals)
        if name == "iota_2x32_shape":
            return list(_iota_2x32(tuple(params["shape"])))
        body = _call_body(eqn)
        if body is not None and _uses_keys(body[0]):
            return self.eval(body[0], body[1], invals)
        if any(_uses_keys(sub) for sub in _sub_jaxprs(eqn)):
            if name in _CONTROL_FLOW:
                return _CONTROL_FLOW[name](self, params, invals)
            self.refuse(eqn, f"random numbers inside {name} are not supported")
        if any(_is_key(v.aval) for v in (*eqn.invars, *eqn.outvars)):
            out = _on_key_data(eqn, invals)
            if out is None:
                self.refuse(eqn, "this operation on a PRNG key is not supported")
            return out
        return bind_eqn(eqn, invals)

    # Control flow whose body draws: rebuilt through jax.lax with the body run through this
    # rewrite, so jax derives the new body's types (keys as data, shard_map's varying axes).
    def scan(self, params, invals: list) -> list:
        body, nc, nk = params["jaxpr"], params["num_consts"], params["num_carry"]
        consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]

        def step(carry, x):
            outs = self.eval(body.jaxpr, body.consts, [*consts, *carry, *x])
            return outs[:nk], outs[nk:]

        carry, ys = lax.scan(
            step, list(init), list(xs), length=params["length"], reverse=params["reverse"],
            unroll=params["unroll"],
        )  # fmt: skip
        return [*carry, *ys]

    def while_loop(self, params, invals: list) -> list:
        cond, body = params["cond_jaxpr"], params["body_jaxpr"]
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]

        def cond_fun(carry):
            return self.eval(cond.jaxpr, cond.consts, [*cond_consts, *carry])[0]

        def body_fun(carry):
            return self.eval(body.jaxpr, body.consts, [*body_consts, *carry])

        if cond.out_avals[0].shape:  # a vmapped while_loop drawing per key
            from jax_ark._persistent._trace import while_any

            return list(while_any(cond_fun, body_fun, init))
        return list(lax.while_loop(cond_fun, body_fun, list(init)))

    def cond(self, params, invals: list) -> list:
        index, operands = invals[0], invals[1:]

        def branch(closed):
            return lambda *ops: self.eval(closed.jaxpr, closed.consts, list(ops))

        return list(lax.switch(index, [branch(b) for b in params["branches"]], *operands))


_CONTROL_FLOW = {"scan": _Rewriter.scan, "while": _Rewriter.while_loop, "cond": _Rewriter.cond}


def without_keys(closed, avals):
    """closed (jax.make_jaxpr of fn on avals) with every PRNG key replaced by its key data and
    every random primitive by plain uint32 code; closed itself when it draws nothing."""
    if not _uses_keys(closed.jaxpr):
        return closed
    rewriter = _Rewriter()

    def rewritten(*args):
        return rewriter.eval(closed.jaxpr, closed.consts, list(args))

    return jax.make_jaxpr(rewritten)(*avals)


def key_data_arguments(fn: Callable, args: tuple) -> tuple[Callable, tuple]:
    """(fn', args') where every typed PRNG key among args (`jax.random.key`, flax nnx's Rngs) is
    passed as its raw uint32 key data, which fn' wraps back into the same kind of key, and every
    key fn returns comes back as its key data too: the FFI call takes and returns plain arrays.
    fn'.key_impls: the argument keys' kinds (part of a plan cache's key: the same uint32 data
    planned as a key and as an array differ); fn'.out_key_impls: the returned keys' kinds, set
    when fn' is traced (`with_output_keys` wraps them again)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    impls = [jax.random.key_impl(x) if _is_key(x) else None for x in leaves]
    if not any(impls):
        return fn, args
    raw = [jax.random.key_data(x) if impl else x for x, impl in zip(leaves, impls, strict=True)]

    def with_keys(*call_args):
        flat = jax.tree_util.tree_leaves(call_args)
        keyed = [
            jax.random.wrap_key_data(x, impl=impl) if impl else x
            for x, impl in zip(flat, impls, strict=True)
        ]
        outs, out_tree = jax.tree_util.tree_flatten(fn(*jax.tree_util.tree_unflatten(tree, keyed)))
        with_keys.out_key_impls = [jax.random.key_impl(y) if _is_key(y) else None for y in outs]
        raw_outs = [jax.random.key_data(y) if _is_key(y) else y for y in outs]
        return jax.tree_util.tree_unflatten(out_tree, raw_outs)

    functools.update_wrapper(with_keys, fn)
    with_keys.key_impls = tuple(str(impl) if impl else None for impl in impls)
    with_keys.out_key_impls = []
    return with_keys, tuple(jax.tree_util.tree_unflatten(tree, raw))


def with_output_keys(outs: list, impls: list | None) -> list:
    """The flat outputs of a call with the returned keys wrapped again (impls from
    key_data_arguments' fn'.out_key_impls; None or empty: no keys)."""
    if not impls or not any(impls):
        return outs
    return [
        jax.random.wrap_key_data(y, impl=impl) if impl else y
        for y, impl in zip(outs, impls, strict=True)
    ]
