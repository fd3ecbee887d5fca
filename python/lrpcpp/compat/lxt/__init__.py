"""LXT's functions with LXT's signatures, computed by lrpcpp's operators.

The module paths mirror LXT's, so that code written for LXT runs on lrpcpp by changing its imports::

    import lrpcpp.compat.lxt.explicit.functional as lf  # was: import lxt.explicit.functional as lf
    import lrpcpp.compat.lxt.efficient.rules as rules  # was: import lxt.efficient.rules as rules

The rules are lrpcpp's, which differ from LXT's on purpose in three places (RULES.md): denominators
are stabilised with their sign (``z + eps * sign(z)``, LXT adds ``eps``); ``softmax`` sums the
relevance over ``dim`` (LXT over the last dimension); ``matmul`` with one operand that requires no
grad gives the other all the relevance (LXT gives it half).
"""
