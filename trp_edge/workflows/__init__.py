"""The workflows: compress, build, calibrate, deploy. Each orchestrates the stages below it and owns no runtime
branch; trp_edge re-exports each verb as a function (trp_edge.compress, ...)."""
