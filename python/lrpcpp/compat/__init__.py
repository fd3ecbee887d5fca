"""Other libraries' call signatures over lrpcpp's operators, for code written against them:
:mod:`lrpcpp.compat.lxt` (LXT's ``lxt.explicit.functional`` and ``lxt.efficient.rules``). None of
those libraries is needed; the math is lrpcpp's (RULES.md)."""
