"""Generated protobuf and gRPC modules for aegis.edge.v1 (see proto/)."""
