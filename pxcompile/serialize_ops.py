"""The operators a model file may call: one reviewed list, plain names (no torch import).

A ``.px`` file is a program; :func:`pxcompile.load` runs only programs made of the operators
named here, exactly (overload included): never a whole namespace. Names are written the way
``str()`` prints an operator overload (``aten.linear.default``); torch.export's JSON spells the
same operator ``torch.ops.aten.linear.default`` (see :func:`serialized_name`). Python
operators on symbolic sizes are named by module and function (``_operator.mul``).

How the list is kept: ``tests/test_serialize_ops.py`` exports the models pxcompile supports
(the examples, the test zoo, small Hugging Face / torchvision / timm models) and the coverage
sweep (``tests/test_coverage.py``) saves its 23 architectures; both fail, naming the operator,
when an export emits one that is not listed. Review a new operator before adding
it: it must only compute on the tensors it is given, and it must not

* touch files, storage or raw memory (``from_file``, ``set_``, ``as_strided``, ``resize_``,
  ``_local_scalar_dense`` of raw pointers, ...);
* return uninitialised memory (``empty``, ``new_empty``, ``empty_like``, ``empty_strided``:
  their bytes are whatever the allocator held before, which a model's output would leak);
* take offsets or indices it does not bounds-check (``_embedding_bag*``, ``_unsafe_index``,
  ``_unsafe_masked_index``; the indexing operators listed here check their indices).

In-place operators are listed only where exports emit them (buffer updates, ``add_`` in T5,
``fill_`` in Swin, activations with ``inplace=True``); :mod:`pxcompile.serialize_check` also
refuses a graph that writes into its callers' inputs.
"""

from __future__ import annotations

__all__ = ["ALLOWED_OPS", "EXPORTED_OPS", "NEVER_OPS", "PYTHON_OPS", "REVIEWED_OPS", "is_allowed"]

# What exports of the supported models emit (torch 2.14); the test keeps this honest.
EXPORTED_OPS: frozenset[str] = frozenset(
    {
        # pxcompile's own layers
        "pxcompile.pixelfly_linear.default",
        "pxcompile.pixelfly_attention.default",
        # linear algebra, convolution, attention
        "aten.linear.default",
        "aten.addmm.default",
        "aten.matmul.default",
        "aten.einsum.default",
        "aten.tensordot.default",
        "aten.conv2d.default",
        "aten.scaled_dot_product_attention.default",
        # normalisation, activations, dropout (a no-op in the eval-mode graph)
        "aten.layer_norm.default",
        "aten.batch_norm.default",
        "aten.softmax.int",
        "aten.gelu.default",
        "aten.relu.default",
        "aten.relu_.default",
        "aten.silu.default",
        "aten.silu_.default",
        "aten.sigmoid.default",
        "aten.tanh.default",
        "aten.hardsigmoid.default",
        "aten.hardswish_.default",
        "aten.dropout.default",
        "aten.dropout_.default",
        "aten.max_pool2d.default",
        "aten.adaptive_avg_pool2d.default",
        # elementwise arithmetic and comparisons
        "aten.add.Tensor",
        "aten.add_.Tensor",
        "aten.sub.Tensor",
        "aten.mul.Tensor",
        "aten.div.Tensor",
        "aten.neg.default",
        "aten.abs.default",
        "aten.pow.Tensor_Scalar",
        "aten.rsqrt.default",
        "aten.log.default",
        "aten.sin.default",
        "aten.cos.default",
        "aten.min.other",
        "aten.__and__.Tensor",
        "aten.eq.Scalar",
        "aten.eq.Tensor",
        "aten.ne.Scalar",
        "aten.ge.Scalar",
        "aten.gt.Scalar",
        "aten.lt.Scalar",
        "aten.le.Tensor",
        "aten.where.self",
        "aten.where.ScalarOther",
        "aten.masked_fill.Scalar",
        "aten.masked_fill_.Scalar",
        "aten.gt.Tensor",
        "aten.addcmul.default",
        # reductions and scans
        "aten.sum.default",
        "aten.mean.dim",
        "aten.cumsum.default",
        "aten.diff.default",
        "aten.argmax.default",
        # indexing (bounds-checked)
        "aten.embedding.default",
        "aten.gather.default",
        "aten.index.Tensor",
        "aten.select.int",
        "aten.slice.Tensor",
        # shapes and views (size-checked against their input)
        "aten.view.default",
        "aten.reshape.default",
        "aten.permute.default",
        "aten.transpose.int",
        "aten.swapaxes.default",
        "aten.numpy_T.default",
        "aten.expand.default",
        "aten.flatten.using_ints",
        "aten.unflatten.int",
        "aten.squeeze.dim",
        "aten.unsqueeze.default",
        "aten.contiguous.default",
        "aten.split.Tensor",
        "aten.chunk.default",
        "aten.unbind.int",
        "aten.cat.default",
        "aten.pad.default",
        "aten.roll.default",
        # new tensors (filled: never uninitialised memory) and conversions
        "aten.arange.default",
        "aten.arange.start",
        "aten.zeros.default",
        "aten.zeros_like.default",
        "aten.new_zeros.default",
        "aten.new_ones.default",
        "aten.full_like.default",
        "aten.lift_fresh_copy.default",
        "aten.to.dtype",
        "aten.to.device",
        "aten.to.dtype_layout",
        "aten.type_as.default",
        "aten.copy_.default",
        "aten.fill_.Tensor",
        # symbolic sizes and export's own checks
        "aten.sym_size.int",
        "aten._assert_tensor_metadata.default",
    }
)

# Reviewed like the above, not emitted by today's exports of the supported models: what other
# torch versions' export emits for the same layers (2.4-2.13: functional ATen with
# decompositions) and a few common layers' operators.
REVIEWED_OPS: frozenset[str] = frozenset(
    {
        "aten.t.default",
        "aten.mm.default",
        "aten.bmm.default",
        "aten.baddbmm.default",
        "aten.convolution.default",
        "aten.conv1d.default",
        "aten._scaled_dot_product_flash_attention_for_cpu.default",
        "aten.native_layer_norm.default",
        "aten._native_batch_norm_legit_no_training.default",
        "aten.group_norm.default",
        "aten._softmax.default",
        "aten._log_softmax.default",
        "aten.log_softmax.int",
        "aten.native_dropout.default",
        "aten.exp.default",
        "aten.sqrt.default",
        "aten.erf.default",
        "aten.hardtanh.default",
        "aten.hardswish.default",
        "aten.clamp.default",
        "aten.maximum.default",
        "aten.minimum.default",
        "aten.add.Scalar",
        "aten.sub.Scalar",
        "aten.mul.Scalar",
        "aten.div.Scalar",
        "aten.rsub.Scalar",
        "aten.sum.dim_IntList",
        "aten.mean.default",
        "aten.amax.default",
        "aten.var_mean.correction",
        "aten.avg_pool2d.default",
        "aten._adaptive_avg_pool2d.default",
        "aten.tril.default",
        "aten.triu.default",
        "aten.masked_fill.Tensor",
        "aten.logical_not.default",
        "aten.index_select.default",
        "aten.squeeze.dims",
        "aten.stack.default",
        "aten.split_with_sizes.default",
        "aten._unsafe_view.default",  # "unsafe" for autograd aliasing; sizes are checked
        "aten.clone.default",
        "aten.alias.default",
        "aten._to_copy.default",
        "aten.full.default",
        "aten.ones.default",
        "aten.ones_like.default",
        # Common layers of user models outside the sweep (3-D/transposed convolutions,
        # resampling, 1-D/3-D pooling, a few activations): pure computations on their inputs,
        # output sizes derived from checked input sizes, no offsets into storage.
        "aten.conv3d.default",
        "aten.conv_transpose1d.default",
        "aten.conv_transpose2d.input",
        "aten.conv_transpose3d.input",
        "aten.upsample_nearest1d.vec",
        "aten.upsample_nearest2d.vec",
        "aten.upsample_nearest3d.vec",
        "aten.upsample_linear1d.vec",
        "aten.upsample_bilinear2d.vec",
        "aten.upsample_bicubic2d.vec",
        "aten.max_pool1d.default",
        "aten.max_pool3d.default",
        "aten.avg_pool1d.default",
        "aten.avg_pool3d.default",
        "aten.adaptive_avg_pool1d.default",
        "aten.adaptive_avg_pool3d.default",
        "aten.adaptive_max_pool1d.default",
        "aten.adaptive_max_pool2d.default",
        "aten.instance_norm.default",
        "aten.pixel_shuffle.default",
        "aten.pixel_unshuffle.default",
        "aten.repeat.default",
        "aten.flip.default",
        "aten.topk.default",
        "aten.sort.default",
        "aten.leaky_relu.default",
        "aten.elu.default",
        "aten.mish.default",
        "aten.softplus.default",
        "aten.glu.default",
        "aten.prelu.default",
        "aten.log_sigmoid.default",
        "aten.relu6.default",
        "aten.hardtanh_.default",
    }
)

# Arithmetic on symbolic sizes (Python ints at run time); no pow or shifts: their results
# can be made arbitrarily large.
PYTHON_OPS: frozenset[str] = frozenset(
    {
        "_operator.getitem",
        "_operator.add",
        "_operator.sub",
        "_operator.mul",
        "_operator.floordiv",
        "_operator.mod",
        "_operator.neg",
        "_operator.eq",
        "_operator.ne",
        "_operator.lt",
        "_operator.le",
        "_operator.gt",
        "_operator.ge",
        "torch.sym_max",
        "torch.sym_min",
        "torch.sym_not",
    }
)

ALLOWED_OPS: frozenset[str] = EXPORTED_OPS | REVIEWED_OPS | PYTHON_OPS

# Never allowed, whatever an export emits (the test checks none of them is listed above):
# files, storage, raw memory, uninitialised memory, unchecked offsets.
NEVER_OPS: frozenset[str] = frozenset(
    {
        "aten.from_file.default",
        "aten.set_.source_Storage",
        "aten.set_.source_Storage_storage_offset",
        "aten.set_.source_Tensor",
        "aten.set_.default",
        "aten.as_strided.default",
        "aten.as_strided_.default",
        "aten.as_strided_scatter.default",
        "aten.resize_.default",
        "aten.resize_as_.default",
        "aten.empty.memory_format",
        "aten.empty_like.default",
        "aten.empty_strided.default",
        "aten.new_empty.default",
        "aten.new_empty_strided.default",
        "aten.embedding_bag.default",
        "aten._embedding_bag.default",
        "aten._embedding_bag_forward_only.default",
        "aten._unsafe_index.Tensor",
        "aten._unsafe_masked_index.default",
        "aten.save.default",
    }
)


def is_allowed(name: str) -> bool:
    """Whether a model file may call the operator ``name`` (``aten.linear.default`` or
    ``_operator.mul``)."""
    return name in ALLOWED_OPS


def serialized_name(name: str) -> str:
    """How torch.export's JSON names the operator ``name``."""
    return name if name in PYTHON_OPS else f"torch.ops.{name}"
