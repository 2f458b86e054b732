"""Stubs generated from proto/bul.proto (see bulk.grpc_service.regenerate); do not edit by hand."""
