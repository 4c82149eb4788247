"""GpuTargetConfigProto text files for deviceless GPU compiles (package data)."""
