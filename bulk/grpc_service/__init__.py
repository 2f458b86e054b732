"""BULService over gRPC (`bul grpc`): proto in proto/bul.proto, committed stubs in `generated/`."""
