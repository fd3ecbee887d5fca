"""lrpcpp inside other attribution libraries: :mod:`lrpcpp.interop.captum` (a Captum attribution
class) and :mod:`lrpcpp.interop.inseq` (an inseq attribution method). Each is imported on its own;
lrpcpp needs neither library."""
