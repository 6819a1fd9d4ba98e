"""SD on EKS's API (`POST /`): asynchronous jobs whose images land in S3 where the client asked."""
from api.dialects.eks.routes import blp

__all__ = ["blp"]
