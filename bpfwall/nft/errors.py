"""The one error class of the nft backend."""
from ..errors import UserError


class NftError(UserError):
    """A request the nft backend refuses or nftables rejected; str() is one line."""
