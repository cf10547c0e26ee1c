"""Membership in etcd: node records under a lease (`registry`), the scheduler's leadership (`leadership`) and a local etcd process (`etcd_process`)."""
