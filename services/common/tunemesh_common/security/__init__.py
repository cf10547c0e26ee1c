"""Transport security of the mesh: its CA and certificates (`pki`), TLS credentials, the identities peers verify and who may call whom (`tls`)."""
